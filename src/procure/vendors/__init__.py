"""Vendors: the vendor HTTP protocol's client and the mock GPU vendor service."""
