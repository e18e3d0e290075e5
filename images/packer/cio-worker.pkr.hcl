# A render node image for GCE and EC2: cio-worker installed from a built wheel into
# /opt/cio-worker/venv (never the work tree), its systemd unit enabled, and the site's renderer
# installed by the site's own script. Build (README "Deploying a farm"):
#   pip wheel --no-deps -w dist .
#   packer init images/packer
#   packer build -var wheel=dist/cio_worker-0.1.0-py3-none-any.whl \
#     -var renderer_install=site/install-clarisse.sh -var gce_project_id=my-project \
#     -only 'googlecompute.*' images/packer          # or -only 'amazon-ebs.*'
# The licence server is the site's (its renderer_install script, or the job's task template),
# never part of this image.

variable "wheel" {
  type        = string
  description = "the cio-worker wheel to install (pip wheel --no-deps -w dist .)"
}

variable "renderer_install" {
  type        = string
  default     = ""
  description = "the site's script that installs the renderer (Clarisse's cnode); default: renderer-install.sh here, which installs none"
}

variable "renderer_env" {
  type        = list(string)
  default     = []
  description = "KEY=VALUE settings for renderer_install (versions, the site's licence server...)"
}

variable "gce_project_id" {
  type    = string
  default = ""
}

variable "gce_zone" {
  type    = string
  default = "us-central1-a"
}

variable "gce_source_image_family" {
  type    = string
  default = "debian-12"
}

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "aws_instance_type" {
  type    = string
  default = "c6i.large"
}

locals {
  image_name = "cio-render-node-${formatdate("YYYYMMDDhhmmss", timestamp())}"
  staging    = "/tmp/cio-worker"
}

source "googlecompute" "render_node" {
  project_id          = var.gce_project_id
  zone                = var.gce_zone
  source_image_family = var.gce_source_image_family
  image_name          = local.image_name
  image_family        = "cio-render-node"
  ssh_username        = "packer"
  machine_type        = "e2-standard-2"
}

source "amazon-ebs" "render_node" {
  region        = var.aws_region
  instance_type = var.aws_instance_type
  ami_name      = local.image_name
  ssh_username  = "admin"
  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["136693071363"] # Debian's own account
    most_recent = true
  }
}

build {
  sources = ["source.googlecompute.render_node", "source.amazon-ebs.render_node"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}"]
  }

  # Only what is installed travels: the wheel and the systemd files.
  provisioner "file" {
    source      = var.wheel
    destination = "${local.staging}/${basename(var.wheel)}"
  }

  provisioner "file" {
    source      = "${path.root}/../systemd/"
    destination = local.staging
  }

  provisioner "shell" {
    inline = [
      # libvectorscan5: Hyperscan with AVX2 code, which the agent scans render output with (node/scandb.py).
      "sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv libvectorscan5",
      # The renders' user: no home, no shell, no groups of note; the agent (root) runs as itself.
      "sudo useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin render || true",
      "sudo python3 -m venv /opt/cio-worker/venv",
      "sudo /opt/cio-worker/venv/bin/pip install --no-cache-dir ${local.staging}/${basename(var.wheel)}",
      # The configuration (and the token written here at boot) is root's alone: renders cannot read it.
      "sudo install -d -m 0700 /etc/cio-worker",
      "sudo install -m 0644 ${local.staging}/cio-worker.service /etc/systemd/system/",
      "sudo install -m 0600 ${local.staging}/agent.env.example /etc/cio-worker/agent.env",
      "sudo systemctl enable cio-worker.service",
    ]
  }

  # The site's hook: install the renderer (and whatever licence settings the site uses).
  provisioner "shell" {
    script           = var.renderer_install != "" ? var.renderer_install : "${path.root}/renderer-install.sh"
    environment_vars = var.renderer_env
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }

  provisioner "shell" {
    inline = ["rm -rf ${local.staging}"]
  }
}
