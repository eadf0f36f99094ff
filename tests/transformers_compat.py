"""What differs between the Transformers releases the tests run on (the newest 5.x and 5.17).

``CACHE``: the name of the KV-cache argument of a model's forward and of the output field that returns it. Newer
releases call it ``cache`` (``past_key_values`` still works there with a deprecation warning and goes away in 5.40);
5.17 knows only ``past_key_values``. Pass it as ``model(ids, **{CACHE: cache})``, read it as ``getattr(out, CACHE)``.
"""

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
