"""The ``dsv4`` command: ``inspect``, ``verify`` (and later ``compare``, ``fix``, ``bench-acceptance``)."""
