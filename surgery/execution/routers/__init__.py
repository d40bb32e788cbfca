"""Router rows: every way of making them behind one registry (``registry``), one signature (``request``).

* ``data_free``: zero, normal, uniform (plan nodes: computed by the writer);
* ``kmeans`` (upcycle), ``ridge`` (split), ``classifier`` (merge: class-mean, logistic, embedding, a shared
  expert's sigmoid gate), ``centroid`` (split, from the weights), ``added_row`` (add-experts): fitted;
* ``measure``: a router's weights, shares and oracle hits on router inputs.
"""
