"""Multi-task data: task specs and readers, the default suite, synthetic tasks, tokenisation, sampling."""
