"""The base every layer stands on: errors that become one line and an exit code, byte sizes, typed records."""
