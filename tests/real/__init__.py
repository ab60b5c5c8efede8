"""Tests against real serving stacks (llama-cpp-python, llama-server, vLLM) with a real model.

Set-up lives in ``stacks.py`` (cached in ``$TOOLMEND_CACHE``, default ``~/.cache/toolmend``);
every test here is marked ``real``. ``pytest -m "not real"`` runs the fast suite alone.
"""
