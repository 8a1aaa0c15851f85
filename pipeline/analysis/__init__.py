"""Reading a sink: status, export, eval, report, review."""
