"""The REST API, one router per resource; each route calls one method of its resource's
service and does nothing but (de)serialisation."""
