"""One API call: the request, the client that sends it, and how its reply and errors are read."""
