"""What a person looks at: figures of a fitted configuration and ``topocam explain``."""
