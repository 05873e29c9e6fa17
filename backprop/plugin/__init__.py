"""The pytest plugin's machinery: loading a user's implementation (``implementations``) and the
checks each generated test runs (``checks``). The hooks live in ``backprop.pytest_plugin``, which
imports nothing heavy until a run asks for it; see docs/plugin.md."""
