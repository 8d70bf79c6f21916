"""Local lmms-eval tasks (`--include_path llava/eval/lmms_tasks`); each folder is one task family."""
