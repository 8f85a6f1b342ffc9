"""Graph passes: analysis (tagging only), the dimension core, one rewrite pass per file, the runner."""

if __name__ != "vdopt.passes":  # imported as a bare 'passes' because the repository root is on sys.path
    from vdopt._bare_import import import_installed_instead

    import_installed_instead(__name__, __path__)
