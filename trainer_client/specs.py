"""`module:name` specs on the command line (`--reward_funcs`, `--tools`, `--environment`): load the
callable they name, or raise the caller's setup error saying what was wrong."""

import importlib


def load_callable(spec: str, what: str, error: type[Exception], malformed: str | None = None):
    """`what` names the thing in messages (`reward 'x:y'`, `--tools 'x:y'`); `malformed` is the whole
    message for a spec that is not module:name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(malformed or f"{what}: give it as module:name (a module on PYTHONPATH, a name in it)")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise error(f"{what} cannot be loaded: {exc}") from None
    if not callable(obj):
        raise error(f"{what} is not callable")
    return obj
