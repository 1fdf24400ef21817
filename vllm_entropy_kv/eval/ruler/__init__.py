"""A RULER-style long-context suite built from the texts the registry packages ship
(Paul Graham essays, the Lee news corpus), so nothing downloads.

Tasks follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"): needle retrieval with one or several keys, values and queries,
variable tracking, common- and frequent-word extraction, and QA over a haystack of documents.
Every sample comes from a seeded generator, so a (seed, task, length, index) names one prompt.
"""
