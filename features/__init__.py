"""Features stage: load raw data, validate it (Great Expectations), publish it to Feast.

Modules:
    datasets  built-in loaders (``pathology``) that return a raw DataFrame
    ingest    load -> validate -> drop identifiers -> write the offline parquet
    validate  the data-quality gate generated from the spec
    store     the Feast repo generated from the spec: apply, materialize, retrieval
"""
