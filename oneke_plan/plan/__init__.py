"""Planning, pure byte arithmetic without torch: memory terms, placement, the machine, speed, the profile."""
