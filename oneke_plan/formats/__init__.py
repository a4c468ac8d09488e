"""The text formats: DeepKE's chat templates and OneKE's instructions, schemas and answers, as data and pure code."""
