"""One module per checkpoint convention. Each exports ``TOP``, ``SCOPES``, ``BLOCK`` and ``MTP`` tables.

Rows: ``(source template, canonical target or None, reason[, options])``. A block rule applies under every
scope of its convention; ``MTP`` rows apply only inside an MTP block. See ``naming/rule.py`` for templates.
"""
