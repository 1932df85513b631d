"""The DFT loss family as pure functions; see core.py for the definition and variants.py for the table."""
