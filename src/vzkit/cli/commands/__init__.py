"""The ``vz`` commands, one module per group; each declares its parsers and handlers together
(see :mod:`vzkit.cli.base`) and ``vzkit.cli.main`` assembles them."""
