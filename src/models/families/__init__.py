"""One module per model family; importing this package registers them all."""

from importlib import import_module

for _module in ("llava", "idefics2", "qwen"):
    try:
        import_module(f"vlmc.models.families.{_module}")
    except ModuleNotFoundError as e:  # a family module still being written must not break the others
        if e.name != f"vlmc.models.families.{_module}":
            raise
