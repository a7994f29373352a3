"""Evaluation: BFCL v3 offline.

``bfcl`` (single-turn AST, Java/JavaScript, (ir)relevance),
``multi_turn`` (dialogues against BFCL's simulated environments), ``executable``
(exec categories where their functions run offline), ``overall`` (the leaderboard's
formula), ``runner`` (every category, resumable via ``results``), ``chat_format`` (old
names for ``chat.templates``' renderers: prompts are built and completions read through a
``ChatRenderer``), ``calls`` (calls as BFCL's call strings) and the ``star-train eval``
command (``command``); Hugging Face generation in ``generation``.
"""
