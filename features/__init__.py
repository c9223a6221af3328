"""Features stage: load raw data, validate it (Great Expectations), publish it to Feast.

Modules:
    datasets        built-in loaders (``pathology``, ``readmission``) that return a raw
                    DataFrame, and ``batches`` of scoring-time records for the demo and tests
    draft           ``clinml init``: a spec drafted from a data file
    profile         the quality profile learned from the first accepted batch
    ingest          load -> validate -> drop identifiers -> commit the offline parquet
                    (all or nothing)
    validate        the data-quality gate generated from the spec
    store           the Feast repo generated from the spec: apply, materialize, retrieval
    online_sqlite   bulk materialization into, and direct reads from, the SQLite online store
    online_feast    online reads from any other Feast online store (Redis in production)
    feast_internals every private part of Feast clinml uses (the SQLite online store's
                    layout, the registry's materialization record), in one adapter
    gx_internals    the one private part of Great Expectations clinml uses (progress bars)
    offline         the PostgreSQL offline store's tables, replaced in one transaction
    registry_store  Feast's file registry, replaced by rename instead of rewritten in place
    patients        the raw patient ids ``/predict_patient`` answers for (fresh in the
                    online store)
"""
