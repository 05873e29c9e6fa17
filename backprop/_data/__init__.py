"""The shipped word list as package data: names.txt links to data/names.txt of the repository
(written by data/build_names.py); a wheel or sdist holds a copy of the file."""
