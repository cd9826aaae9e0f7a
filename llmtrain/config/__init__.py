"""Config schema, validation and estimates."""
