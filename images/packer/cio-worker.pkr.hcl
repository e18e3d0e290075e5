# Bakes cio-worker into a GCE image (the EC2 builder is the same provisioner block with an
# amazon-ebs source). Build: packer init . && packer build -var project_id=... cio-worker.pkr.hcl
packer {
  required_plugins {
    googlecompute = { source = "github.com/hashicorp/googlecompute", version = ">= 1.1.0" }
  }
}

variable "project_id" { type = string }
variable "zone" { default = "us-central1-a" }
variable "source_image_family" { default = "debian-12" }

source "googlecompute" "render_node" {
  project_id          = var.project_id
  zone                = var.zone
  source_image_family = var.source_image_family
  image_name          = "cio-render-node-{{timestamp}}"
  image_family        = "cio-render-node"
  ssh_username        = "packer"
  machine_type        = "e2-standard-2"
}

build {
  sources = ["source.googlecompute.render_node"]

  provisioner "file" {
    source      = "../../"
    destination = "/tmp/cio-worker"
  }

  provisioner "shell" {
    inline = [
      "sudo apt-get update && sudo apt-get install -y python3-venv",
      "sudo useradd --system --create-home render || true",
      "sudo python3 -m venv /opt/cio-worker/venv",
      "sudo /opt/cio-worker/venv/bin/pip install /tmp/cio-worker",
      "sudo install -d -o render /var/lib/cio-worker /var/cache/cio-worker /etc/cio-worker",
      "sudo install -m 0644 /tmp/cio-worker/images/systemd/cio-worker.service /etc/systemd/system/",
      "sudo install -m 0644 /tmp/cio-worker/images/systemd/agent.env.example /etc/cio-worker/agent.env",
      "echo 'render ALL=(root) NOPASSWD: /usr/bin/systemctl poweroff' | sudo tee /etc/sudoers.d/cio-worker",
      "sudo systemctl enable cio-worker.service",
    ]
  }
}
