"""The v1 recipe ablation (issue #9): does Conan's training beat a plain multi-task fine-tune?

``arms`` (the arms and the rows every part shares) < ``inputs`` (data, pools and base model,
built once) < ``report`` (the results page from the result JSONs) < ``run`` (one arm, the
base model, truncated dimensions, the whole ablation). ``conan-embed recipe ...`` only calls
these.
"""

from __future__ import annotations
