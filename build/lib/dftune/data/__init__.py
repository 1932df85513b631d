"""The data pipeline: files -> records -> messages -> rendered, supervised tokens -> cached datasets and a report."""
