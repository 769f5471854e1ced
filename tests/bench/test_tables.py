from bench.tables import ssl_table


def test_ssl_table_lists_every_method_with_mean_and_spread():
    stats = {"runs": 2, "accuracy": {"mean": 0.81, "std": 0.01},
             "macro_f1": {"mean": 0.8, "std": 0.02}, "macro_auc": {"mean": None, "std": None}}
    payload = {"aggregates": {"0.1": {"linear_probe": stats, "supervised": {"runs": 0}}},
               "labeled_counts": {"0.1": 47},
               "label_free": {"simclr": {"knn_accuracy": 0.7, "kmeans": {"purity": 0.6, "nmi": 0.2}}}}
    table = ssl_table(payload)
    assert "| 10% (47) | SimCLRv2 linear probe | 2 | 0.810 ± 0.010 | 0.800 ± 0.020 | — |" in table
    assert "supervised" not in table and "| simclr | 0.700 | 0.600 | 0.200 |" in table


def test_ssl_table_gives_the_cluster_views_k_where_measured():
    payload = {"aggregates": {}, "labeled_counts": {},
               "label_free": {"simclr": {"knn_accuracy": 0.7,
                                         "kmeans": {"purity": 0.6, "nmi": 0.2, "k": 2},
                                         "kmeans_view": {"purity": 0.8, "nmi": 0.25, "k": 8}},
                              "pixels": {"knn_accuracy": 0.6,
                                         "kmeans": {"purity": 0.5, "nmi": 0.1, "k": 2},
                                         "kmeans_view": {"purity": 0.7, "nmi": 0.15, "k": 8}}}}
    table = ssl_table(payload)
    assert "| purity, k = 8 | NMI, k = 8 |" in table
    assert "| simclr | 0.700 | 0.600 | 0.200 | 0.800 | 0.250 |" in table
    assert "| pixels | 0.600 | 0.500 | 0.100 | 0.700 | 0.150 |" in table
