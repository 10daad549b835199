"""The closed-form ascent engines: exact EM and CAVI.

Both run a family's own algorithm object (``family.em()`` / ``family.cavi()``, declared by the
``ClosedFormEM`` / ``ClosedFormCAVI`` capabilities) through one loop (``loop.py``); ``em.py`` and
``cavi.py`` are the engines' entry points.
"""
