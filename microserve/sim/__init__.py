"""`microserve sim`: strategies on simulated clusters in virtual time.

`costs` is the roofline cost model and its hardware / model profiles (`profiles/*.json`).
"""
