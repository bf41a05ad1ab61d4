"""The packaged YAML defaults (installed as ``otbr_plugin.configs``; read with importlib.resources through
:func:`otbr_plugin.config.resolve_config`): ``defense/<name>/<dataset>.yaml``, ``attack/<name>/<dataset>.yaml``,
``bench/<grid>.yaml``."""
