"""Files users hand the tools and files the tools write: bounded JSON and YAML readers, limits, safe writing."""
