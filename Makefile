.PHONY: notebooks

# execute the teaching notebooks top to bottom (nbmake)
notebooks:
	python -m pytest --nbmake notebooks -q
