"""Generation methods: one sub-package per method, each a `Synthesizer` subclass plus its config.

Nothing imports from a method package except the registry in `dpimages.api`
(``METHOD_CLASSES``), which imports a method's module on first use.
"""
