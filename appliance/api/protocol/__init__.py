"""Typed wire models and pure translations, one module per dialect.

Every request, response, stream chunk and error the appliance speaks is a pydantic model here; handlers,
the OpenAPI document and the error renderer all use these, so no wire shape is written twice.
"""
