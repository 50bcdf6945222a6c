"""A small compositional text-to-image task on which compression quality is measured
(docs/quality.md): scenes and captions, a real text encoder, a judge, and the teacher."""
