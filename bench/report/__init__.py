"""Reports from result rows: load -> tables / figures -> Markdown and PNG files; the cost claim; comparisons."""
