"""vLLM v1 KV connector and SGLang HiCache backend on top of :mod:`store`.

Importing this package must not import vLLM, torch or cupy: those are loaded only by the modules
that need them, when they are used.
"""
