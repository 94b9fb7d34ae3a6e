"""Run configuration: one YAML file = one run, typed and checked at load (schema.py, typed_yaml.py)."""
