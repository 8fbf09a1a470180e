"""The napari dock widget: a thin Qt layer over the Qt-free core and training modules."""
