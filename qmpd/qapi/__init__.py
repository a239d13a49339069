"""The QAPI schema pipeline: QAPI files -> Schema -> JSON Schema, introspection, models.

Modules (L1; imports only :mod:`qmpd.errors`, pydantic and jsonschema)::

    loader      QAPI text -> expressions with file:line
    builder     expressions -> checked Schema
    schema      Schema entities and lookups; load_schema()
    introspect  Schema -> query-qmp-schema answer (SchemaInfo list)
    jsonschema  Schema -> JSON Schema (draft 2020-12)
    modelgen    Schema -> source of models.py
    models      generated pydantic models (never edited by hand)
    validate    ArgumentValidator: QEMU-worded argument errors, model building
    gen         ``python -m qmpd.qapi.gen``: writes the checked-in outputs
"""
