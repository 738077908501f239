"""Mooncake: a torch.distributed backend (``backend="mooncake"``) over a C collective engine.

``import mooncake`` registers the backend. Without the import, installed entry points do it:
``torch.distributed.backends`` (torch >= 2.14, loaded lazily by ``init_process_group``) and
``torch.backends`` (older torch, loaded while ``import torch`` runs).
"""

import sys

__version__ = "0.1.0"

__all__ = ["__version__"]


def _create_backend(opts, pg_options=None):
    """Extended-API creator: called by torch once per group on its member ranks."""
    from . import _C  # loads libmooncake only when a group is actually created

    return _C._create_backend(
        opts.store, opts.group_rank, opts.group_size, opts.timeout, opts.group_id or ""
    )


def _register_c10d_backend():
    """Register ``"mooncake"`` with torch.distributed (idempotent). Entry-point target."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("mooncake needs torch built with distributed support")
    plugin = getattr(dist.Backend, "_plugins", {}).get("MOONCAKE")
    if plugin is not None and plugin.creator_fn is _create_backend:
        return
    dist.Backend.register_backend(
        "mooncake", _create_backend, extended_api=True, devices=["cpu"]
    )


def _torch_is_importing():
    # importlib marks a module's spec while its top-level code runs; the torch.backends
    # entry point runs inside torch/__init__.py, when torch.distributed can't be imported yet.
    torch = sys.modules.get("torch")
    return torch is not None and getattr(getattr(torch, "__spec__", None), "_initializing", False)


def _torch_version():
    torch = sys.modules.get("torch")
    try:
        major, minor = str(torch.__version__).split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return (0, 0)


def _autoload():
    """``torch.backends`` entry point (torch < 2.14). Must never break ``import torch``."""
    if _torch_version() >= (2, 14):
        return  # the lazy torch.distributed.backends entry point registers on demand
    try:
        _register_c10d_backend()
    except Exception as err:  # noqa: BLE001 - a failure here would abort `import torch`
        import warnings

        warnings.warn(f"mooncake: backend not registered during torch import: {err}")


if not _torch_is_importing():
    _register_c10d_backend()
