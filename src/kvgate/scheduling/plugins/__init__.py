"""Built-in scheduling plugins, one module each; registered by type name in
`kvgate.scheduling.registry.BUILTIN_PLUGINS` and imported only when a configuration uses them."""
