"""Composition of behaviors: task vectors, merge methods, composed model folders."""
