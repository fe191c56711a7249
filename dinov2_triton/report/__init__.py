"""Reports from measured results: the ranking policy (which variant to deploy), the
figures, the Markdown/HTML report and the side-by-side CPU comparison."""
