"""The front door's endpoint picker: Envoy asks it (ext_proc) which replica serves each request."""
