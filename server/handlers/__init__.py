"""Plain handlers, one module per resource: they take a request message and the server's
dependencies, and return a response message. Errors are ``cnnd.server.errors`` exceptions."""
