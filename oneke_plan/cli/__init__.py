"""Thin command-line front ends: parse flags, call the library, print, map errors to exit codes."""
