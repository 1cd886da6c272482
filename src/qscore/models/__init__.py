"""One file per method; ``base`` holds the interface, shared blocks live in their own modules."""
