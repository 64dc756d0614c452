"""The SDK: synchronous and asyncio clients of vzd, their transports and streams."""
