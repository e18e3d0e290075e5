#!/bin/sh
# The site's renderer install hook (packer -var renderer_install=PATH replaces this file): install
# Clarisse's cnode on the image so that `cnode` is on the agent's PATH, from the site's own
# installer or bucket, with the site's licence settings passed as -var 'renderer_env=["KEY=VALUE"]'.
# This default installs nothing, so an image baked with it runs only jobs whose task template names
# a renderer already on the image.
set -eu
echo "renderer_install: no renderer installed (the site's hook was not given)"
