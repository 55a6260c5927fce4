"""Teaching: the lessons (Markdown files in lessons/), the checks they ask of a learner's runs, progress."""
